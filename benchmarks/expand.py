#!/usr/bin/env python
"""Catalog expansion benchmark: `klein-ray expand` on a 1,000,000-row catalog, peak RSS and rows/s.

    .venv/bin/python benchmarks/expand.py [--products 100000] [--scenes 5] [--seeds 2] [--keep DIR]

Goal checked: the expansion streams (peak memory flat in rows, bounded by its batches; the
duplicate-id check spills to disk), at a rate that makes a million-row catalog a minute's
work, not an hour's. Nothing asserts.

1. Writes a products CSV (``--products`` rows: sku, title, photo) and a catalog of ``--scenes``
   scenes x ``--seeds`` seeds with the issue's templates (id from sku, scene and seed; prompt from
   title and scene; one reference; three passthrough columns).
2. In a fresh child process each (their peak RSS is their own: ``VmHWM``), times:
   - ``expand``: ``klein_ray.intake.catalog.expansion.expand_catalog``, what `klein-ray expand` runs;
   - ``baseline``: the same rows built as a Python list with f-strings (no templates, no checks)
     and written with pyarrow in one go (``Table.from_pylist`` + ``write_table``): what a user's
     own script does.
3. Checks the two manifests hold the same rows (the baseline computes the same seeds and
   reference URIs), and prints seconds, rows/s and peak RSS for each, with the ratios.
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
SCENES = ["on a white marble table, soft window light", "on sand at golden hour",
          "in a sunlit scandinavian living room", "flat lay on beige linen, top view",
          "on a concrete plinth, hard studio light", "on a walnut desk beside a window",
          "in the snow at dusk", "on a picnic blanket in a park"]


def write_inputs(root: Path, products: int, scenes: int, seeds: int) -> Path:
    import yaml

    with open(root / "products.csv", "w") as fh:
        fh.write("sku,title,photo\n")
        for i in range(products):
            fh.write(f"SKU-{i:07d},product number {i} in colour {i % 17},photos/{i % 5000:04d}.jpg\n")
    catalog = {
        "products": "products.csv",
        "scenes": [{"name": f"scene{s}", "prompt": SCENES[s % len(SCENES)]} for s in range(scenes)],
        "seeds": seeds,
        "id": "{{ product.sku }}-{{ scene.name }}-{{ seed }}",
        "prompt": "{{ product.title }}, {{ scene.prompt }}",
        "references": ["{{ product.photo }}"],
        "width": 1024, "height": 1024,
        "columns": {"sku": "{{ product.sku }}", "scene": "{{ scene.name }}",
                    "seed_index": {"value": "{{ seed }}", "type": "int"}},
    }
    path = root / "catalog.yaml"
    path.write_text(yaml.safe_dump(catalog, sort_keys=False))
    return path


def child_expand(root: Path) -> dict:
    from klein_ray.intake.catalog.expansion import expand_catalog

    rss0 = _rss_kib()
    t0 = time.perf_counter()
    result = expand_catalog(root / "catalog.yaml", str(root / "expand.parquet"))
    return {"rows": result.rows, "seconds": time.perf_counter() - t0, "rss_after_imports_kib": rss0}


def child_baseline(root: Path) -> dict:
    import csv

    import pyarrow as pa
    import pyarrow.parquet as pq
    import yaml

    from klein_ray.intake.rows import derive_seed
    from klein_ray.intake.schema import manifest_schema

    rss0 = _rss_kib()
    t0 = time.perf_counter()
    catalog = yaml.safe_load((root / "catalog.yaml").read_text())
    scenes, seeds = catalog["scenes"], catalog["seeds"]
    rows = []
    with open(root / "products.csv", newline="") as fh:
        for product in csv.DictReader(fh):
            ref = (root / product["photo"]).as_uri()
            for scene in scenes:
                for k in range(seeds):
                    row_id = f"{product['sku']}-{scene['name']}-{k}"
                    rows.append({"id": row_id, "prompt": f"{product['title']}, {scene['prompt']}",
                                 "references": [ref], "width": 1024, "height": 1024,
                                 "seed": derive_seed(row_id), "sku": product["sku"], "scene": scene["name"],
                                 "seed_index": k})
    schema = manifest_schema([("sku", pa.string()), ("scene", pa.string()), ("seed_index", pa.int64())])
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), root / "baseline.parquet", compression="zstd")
    return {"rows": len(rows), "seconds": time.perf_counter() - t0, "rss_after_imports_kib": rss0}


def _rss_kib(field: str = "VmRSS") -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def run_child(kind: str, root: Path) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, __file__, "--child", kind, "--dir", str(root)], env=env,
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"{kind} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def same_rows(root: Path) -> bool:
    import pyarrow.parquet as pq

    ours = pq.ParquetFile(root / "expand.parquet").read()
    theirs = pq.ParquetFile(root / "baseline.parquet").read()
    return ours.equals(theirs.select(ours.column_names))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    ap.add_argument("--products", type=int, default=100_000)
    ap.add_argument("--scenes", type=int, default=5)
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--keep", type=Path, help="work in this directory and keep its files")
    ap.add_argument("--child", choices=["expand", "baseline"], help=argparse.SUPPRESS)
    ap.add_argument("--dir", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        found = child_expand(args.dir) if args.child == "expand" else child_baseline(args.dir)
        print(json.dumps(dict(found, peak_rss_kib=_rss_kib("VmHWM"))))
        return

    root = args.keep or Path(tempfile.mkdtemp(prefix="klein-ray-expand-bench-"))
    root.mkdir(parents=True, exist_ok=True)
    write_inputs(root, args.products, args.scenes, args.seeds)
    results = {kind: run_child(kind, root) for kind in ("expand", "baseline")}
    print(f"# {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, {platform.node()}, "
          f"{os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f}, Python {platform.python_version()}")
    print(f"# {args.products:,} products x {args.scenes} scenes x {args.seeds} seeds; same rows: {same_rows(root)}")
    print("| | rows | seconds | rows/s | peak RSS MB | RSS after imports MB | file MB |")
    print("|---|--:|--:|--:|--:|--:|--:|")
    for kind, r in results.items():
        size = (root / f"{kind}.parquet").stat().st_size / 1e6
        print(f"| {kind} | {r['rows']:,} | {r['seconds']:.1f} | {r['rows'] / r['seconds']:,.0f} | "
              f"{r['peak_rss_kib'] / 1024:,.0f} | {r['rss_after_imports_kib'] / 1024:,.0f} | {size:.1f} |")
    e, b = results["expand"], results["baseline"]
    print(f"expand/baseline: {e['seconds'] / b['seconds']:.2f}x the time, "
          f"{e['peak_rss_kib'] / b['peak_rss_kib']:.2f}x the peak memory")


if __name__ == "__main__":
    main()
